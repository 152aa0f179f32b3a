import sys

from sasformer.cli import main

sys.exit(main())
