"""`connwatch demo`: a built-in upstream, traffic and connwatch in front, shown live."""
