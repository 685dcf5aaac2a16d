"""Load once, make many videos: the job loop (every rank), prompt files, and the HTTP server.

- loop.py:    the job loop; rank 0 posts each job to the others (channel.py), every rank runs it
- batch.py:   `generate --prompts FILE`, the loop over the items of a file
- server.py:  `python -m lightx2v_sp.serve`, the loop over the jobs of the HTTP front (app.py,
              board.py, page.html); FastAPI and uvicorn are the optional extra `.[serve]`
"""
