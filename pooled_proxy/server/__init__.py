"""Client-facing trio shells: the listeners and the HTTP/1.1 and HTTP/2 front ends."""
