import sys

from llmctl.worker.main import main

sys.exit(main())
