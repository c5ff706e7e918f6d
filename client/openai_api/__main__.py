import sys

from client.openai_api.app import main

sys.exit(main())
