import sys

from sdparity.main import main

sys.exit(main())
