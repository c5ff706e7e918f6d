"""Triton-free building blocks used inside the Triton python models: request preprocessing, the CPU
in-flight batching LLM engine and its sampling, incremental detokenization, the vision runner.
(`triton_io` is the one module that talks to the python backend.)"""

import locale

# The python backend stub embeds Python and ignores the environment (PYTHONUTF8, LANG), so under a
# service manager or CI without a locale `open()` defaults to ASCII, and transformers reading its own
# source files (e.g. in set_attn_implementation) fails. Every model imports this package first.
if locale.getpreferredencoding(False).lower().replace("-", "") != "utf8":
    for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
            break
        except locale.Error:
            continue
