"""What a user error must look like: one line, the documented exit code, no traceback."""

from __future__ import annotations


def one_line(exc_info) -> str:
    """The message of a raised UserError (pytest.raises' exc_info), checked to be one line."""
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


def assert_one_line_error(result, *fragments: str, rc: int = 2) -> str:
    """A non-zero exit `rc`, exactly one non-empty line on stderr, no traceback anywhere,
    and that line contains every fragment. Returns the line."""
    assert result.rc == rc, str(result)
    assert "Traceback" not in result.stderr + result.stdout, str(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr\n{result}"
    line = lines[0]
    assert line.startswith("fmnist-accel: error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line
