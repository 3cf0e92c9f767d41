"""The read-only web view of an output folder: a stream as it runs (``emmae-stream --http``) or a finished
stream's or batch's folder (``emmae-view``). It reads the journal and the output folder and never writes."""
