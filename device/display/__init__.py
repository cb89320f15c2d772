"""The display layer: what instances show, as PNG, over VNC and in a browser.

Between the device model and the control plane: a display is a ``FrameSource``
(source.py: the protocol the device side implements, and ``Framebuffer``, one over a
numpy buffer in this process); frame.py converts its frames to RGB; registry.py
names the displays of a server; screendump.py makes PNGs; tiles.py tracks what
changed; rfb.py, vnc_session.py and vnc.py serve RFB; web.py serves the page.
"""
