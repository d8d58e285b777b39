"""Sans-IO protocol code: bytes in, verdicts or events out. Nothing here imports trio
(a test enforces it), so every edge case is testable without sockets or clocks."""
