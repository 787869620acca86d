"""L1. Image files and their bytes: reading and decoding (`imageio`, `device_decode`),
thumbnails and previews, the link policy, opening an indexed file safely, and the words of a
query or a file name (`keywords`)."""
