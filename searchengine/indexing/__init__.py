"""L4. Index time: scan folders, decode each image once, embed in batches, write store + index."""
