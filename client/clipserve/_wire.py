"""What client and server agree on beyond the protobuf schema (``protos/``): metadata keys,
error reasons and shared defaults. Torch-free and dependency-free, so that the server
(which installs this package) imports these constants instead of writing them again."""

from __future__ import annotations

# Initial metadata of every stream (protos/: "Windows"): how many items the server reads ahead.
MAX_IN_FLIGHT_KEY = "clipserve-max-in-flight"

# ItemError.reason of an item named by image_sha256 alone that the server does not hold: the
# client sends it again with the bytes.
IMAGE_BYTES_NEEDED = "IMAGE_BYTES_NEEDED"

# The largest image file the server accepts by default (--max-image-bytes), and so the largest
# the client uploads by default.
DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024
