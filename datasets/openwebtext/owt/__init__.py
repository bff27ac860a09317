"""OpenWebText-style corpus building: URLs -> pages -> main text -> deduplicated text files."""
