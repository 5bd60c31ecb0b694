"""The flags that find a qrels file's columns and images, as the benchmark maker's config.toml
names them: one definition for ``score-file`` and ``report`` (which reads what score-file wrote)."""

from __future__ import annotations

import argparse


def add_columns_and_images(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", default=None, help="images file mapping image ids to URLs")
    parser.add_argument("--config", default=None, help="the benchmark maker's config.toml")
    parser.add_argument("--column-query", default=None, help="query column (default: query_text)")
    parser.add_argument("--column-image-id", default=None, help="image id column (default: image_id)")
    parser.add_argument(
        "--image-url-column", default=None, help="image URL column, in the images file or the rows (default: image_url)"
    )
    parser.add_argument(
        "--image-base-url",
        default=None,
        help="URL prefix for images with no URL: <base>/<image id>, as the benchmark maker builds them",
    )
