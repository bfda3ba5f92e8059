import time
from test_serve import *  # noqa

def test_dbg(server):
    bodies = [_chat(p, max_tokens=24, temperature=0) for p in PROMPTS]
    for b in bodies:
        t = time.time(); _whole_text(server.url, b); print("alone", time.time() - t)
