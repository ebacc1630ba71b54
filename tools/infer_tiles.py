import sys

from detector.cli.infer_tiles import main

sys.exit(main())
