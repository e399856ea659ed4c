import sys

from marl_ray.cli import main

sys.exit(main())
