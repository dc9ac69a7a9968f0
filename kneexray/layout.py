"""File names inside the extract stage's output folder, shared by the stages that read it.
No imports: a stage that needs a name must not pull in the extraction code with it."""

INDEX_FILE = "index.csv"  # per kept image: path, label, origin (its dataset source), source (its file there), ...
# sha256, width, height, mode and group (copies and one patient's images share a group)
FINGERPRINTS_FILE = "fingerprints.npy"  # near-duplicate fingerprints, in index order
IMAGES_DIR = "images"
CLINICAL_FILE = "patients.csv"  # age, sex, weight per patient, when the archive's table has them
SOURCES_DIR = "sources"  # in the fetch stage's ZIP with several dataset.sources: sources/<name>.zip each
