"""Images from URL or upload to model input: fetching, decoding, preprocessing."""
