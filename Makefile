.PHONY: demo test test-fast
demo:  ## run the main job end to end on the embedded sample world
	./scripts/demo.sh
test:  ## run the whole test suite (what CI runs)
	./scripts/test.sh
test-fast:  ## skip the slow end-to-end tests
	./scripts/test.sh -m "not slow"
