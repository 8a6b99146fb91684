from umair import storage
from umair.storage import StorageSettings

def test_probe(s3_server, monkeypatch):
    st = StorageSettings(endpoint=s3_server.endpoint, region="us-east-1", retries=1)
    fs, _ = storage.resolve("s3://x/y", st)
    for b in ["never-made-bucket", "umair-test"]:
        print(b, fs.get_file_info(b))
    try:
        fs.open_input_stream("never-made-bucket/k")
    except Exception as e:
        print(repr(e))
