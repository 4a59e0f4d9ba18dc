import sys

from llmctl.dataplane.main import main

sys.exit(main())
