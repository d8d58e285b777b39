"""The request inspector: the last exchanges as they went through, on the admin listener.

recorder.py taps the forwarder, views.py makes JSON and HAR of what it kept, replay.py sends
an exchange again, endpoints.py serves it all and page.html under ``/inspect``.
"""
