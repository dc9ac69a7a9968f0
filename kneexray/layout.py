"""File names inside the extract stage's output folder, shared by the stages that read it.
No imports: a stage that needs a name must not pull in the extraction code with it."""

INDEX_FILE = "index.csv"  # one row per kept image: path, label, source, sha256, size, mode, group
FINGERPRINTS_FILE = "fingerprints.npy"  # near-duplicate fingerprints, in index order
IMAGES_DIR = "images"
CLINICAL_FILE = "patients.csv"  # age, sex, weight per patient, when the archive's table has them
