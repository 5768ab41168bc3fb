"""Progress bars that suit where the code runs.

`tqdm.auto` draws ipywidgets bars in any IPython kernel, and a headless executor (papermill under
`dvc repro`, nbval) then stores every bar's widget state in the executed notebook: hundreds of kB of
metadata in files kept in git. So widget bars only where a frontend renders them; text bars, updated
at most every few seconds, everywhere else.
"""

from __future__ import annotations

import os

__all__ = ["tqdm", "widget_frontend_available"]

_HEADLESS_MININTERVAL = 5.0  # seconds between text updates when nobody watches a terminal or widget


def widget_frontend_available() -> bool:
    """Whether this kernel has a frontend that renders ipywidgets (Jupyter, VS Code).

    Headless executors (papermill, nbval, nbclient) start kernels without the session variables a
    Jupyter server or VS Code sets, and there a widget would only leave a text placeholder: the
    notebooks then show the static default figure alone. Override with DKA_WIDGETS=1 / DKA_WIDGETS=0.
    """
    forced = os.environ.get("DKA_WIDGETS")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    return any(os.environ.get(v) for v in ("JPY_SESSION_NAME", "VSCODE_PID", "VSCODE_CWD"))


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


def tqdm(*args, **kwargs):
    """`tqdm.tqdm` with the bar kind chosen as the module docstring says (same arguments)."""
    if widget_frontend_available():
        from tqdm.notebook import tqdm as bar

        return bar(*args, **kwargs)
    from tqdm.std import tqdm as bar

    if _in_kernel():  # headless notebook: few, plain updates
        kwargs.setdefault("mininterval", _HEADLESS_MININTERVAL)
        kwargs.setdefault("ascii", True)
    return bar(*args, **kwargs)
