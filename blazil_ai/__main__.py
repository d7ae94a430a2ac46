import sys

from blazil_ai.cli import main

sys.exit(main())
