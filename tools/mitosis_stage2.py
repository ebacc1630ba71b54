import sys

from detector.cli.mitosis_stage2 import main

sys.exit(main())
