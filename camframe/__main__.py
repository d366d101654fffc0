import sys

from camframe._entry import main

sys.exit(main())
