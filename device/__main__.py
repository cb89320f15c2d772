import sys

from device.control.cli import main

sys.exit(main())
