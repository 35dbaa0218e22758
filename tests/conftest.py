"""Suite-wide settings: eager flow kernels unless a test asks for compilation.

torch.compile takes tens of seconds per new shape on a small CPU, which would dominate a suite
of many tiny images; the compiled path has its own tests that turn it back on.
"""

import os

os.environ.setdefault("TWOSTREAM_NO_COMPILE", "1")
