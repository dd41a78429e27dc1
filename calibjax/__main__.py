import sys

from calibjax.cli import main

sys.exit(main())
