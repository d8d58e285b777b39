"""Operations: the admin listener (status page, metrics, inspector), the access log and
the health-check client."""
