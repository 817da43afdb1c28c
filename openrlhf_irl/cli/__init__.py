"""The package's commands (``python -m openrlhf_irl.cli.<name>``). Importing this package points what torch,
DeepSpeed and triton build at run time into the package's cache (``utils.cache_dir``) where the user has not set
those variables, before any command imports them: nothing in ``~/.cache`` or ``$TMPDIR``."""

from openrlhf_irl.utils.cache_dir import apply_cache_defaults

apply_cache_defaults()
