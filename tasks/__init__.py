"""seqio Tasks and Mixtures shipped with paxlike; importing this module registers them."""

from paxlike.tasks import default_mixture  # noqa: F401  (registration side effect)
from paxlike.tasks import instructions  # noqa: F401  (registration side effect)
from paxlike.tasks import glm  # noqa: F401  (registration side effect)
