import sys

from detector.cli.plot_curves import main

sys.exit(main())
