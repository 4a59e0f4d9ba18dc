"""llmctl: a supervised, GPU-aware LLM inference service.

The distribution installs this one top-level package; its subpackages are the
repository's folders (``pyproject.toml``, ``[tool.setuptools.package-dir]``):

* ``llmctl.common``    (``common/``): what more than one process needs: the config tree,
  the wire protocol, internal messages, typed errors, prefix hashes, process helpers,
  the wire-protocol client;
* ``llmctl.control``   (``control/``): the CLI and the supervisor;
* ``llmctl.dataplane`` (``dataplane/``): the gateway;
* ``llmctl.worker``    (``worker/``): the inference workers;
* ``llmctl.tools``     (``tools/``): the load generator and the other tools.

Process packages import ``llmctl.common`` and themselves, never each other (checked by
``lint-imports``, contracts in ``pyproject.toml``).
"""
