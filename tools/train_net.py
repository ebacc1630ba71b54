import sys

from detector.cli.train_net import main

sys.exit(main())
