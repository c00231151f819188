import sys

from xmppd.cli.server import main

sys.exit(main())
