"""Every record that crosses a process boundary: msgspec Structs with versioned tags.

One module per subject family; ``schemas.codec`` holds the one typed decoder per stream union.
"""
