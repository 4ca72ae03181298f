"""The annotation page: a person's session on a round (:mod:`.session`), the Starlette app over
it (:mod:`.app`) and the page itself (``static/annotate.html``). Imports no Ray."""
