"""Data in: sources and downloads, the phantom, archives and images (DICOM too), curation of
copies and conflicts, the patient table, and the grouped, stratified splits."""
