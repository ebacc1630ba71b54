import sys

from detector.cli.convert_to_coco import main

sys.exit(main())
