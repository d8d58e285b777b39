"""What the tests share: real upstreams, clients and a proxy daemon to run them against."""
