# Per image (shared by all analyses): metadata.json (the server's record plus an "nvmeta"
# status block) and, when the image could be had, map.nii.gz next to it. A failed download
# is a recorded status, not a failed job. Local rule: cluster compute nodes often have no
# internet; downloads run where Snakemake runs.


localrules:
    download,


rule download:
    input:
        # The record the query kept for this image, when there is one. The query rewrites it only
        # when the record changed, so a changed record (e.g. another number_of_subjects in a new
        # dump) reruns this download and hence the z-map; an unchanged one reruns nothing.
        record=lambda wildcards: [
            path
            for path in [f"{RESULTS}/records/{wildcards.image_id}.json"]
            if os.path.exists(path)
        ],
    output:
        f"{IMAGES}/metadata.json",
    log:
        f"{LOGS}/download/{{image_id}}.log",
    # Waiting on the network is not computing: a download holds a connection, not a core, so
    # z-maps run on every core while the next images download.
    threads: 0
    resources:
        nv_connections=1,
    run:
        # In-process (see nvmeta/workflow/jobs.py): no interpreter start-up per image.
        from nvmeta.workflow.jobs import download_job

        download_job(wildcards.image_id, output, log, config["neurovault"])
