"""The tasks module of gin-only corpora: importing it registers paxlike's Tasks and the corpora gin binds.

Point a run at it with `DataConfig.tasks_module = 'paxlike.data.gin_tasks'` and bind
`register_corpora.corpora` / `register_corpora.mixtures` (gin/corpora/example.gin). The
input pipeline imports the tasks module after the gin files and overrides are parsed,
so the bindings are complete when this runs. Python imports a module once a process:
call `paxlike.data.corpus.register_corpora()` to register again after a new parse.
"""

from paxlike import tasks  # noqa: F401  (the default Tasks stay available)
from paxlike.data import corpus

corpus.register_corpora()
