"""User-facing errors.

A `UserError` is a mistake the user can fix (unknown recipe, bad override, missing data,
unwritable workdir, corrupt checkpoint...). The CLI prints its message on one line and exits
with status 2; it never shows a traceback for one.
"""


class UserError(Exception):
  """A problem with the user's input; the message names the problem and the fix."""
