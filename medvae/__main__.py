import sys

from medvae.cli import main

sys.exit(main())
