import sys

from llmctl.control.cli import main

sys.exit(main())
