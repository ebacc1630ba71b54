import sys

from detector.cli.evaluate import main

sys.exit(main())
