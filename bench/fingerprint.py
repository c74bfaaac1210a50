"""A fingerprint of the kernels' results: SHA-1 of the predictions of seeded FM and AFM
fits (3 epochs on the demo data, Cython backend) at 1 and 2 threads; FM with its
defaults and as a plain FM (no dropout or batch norm: the kernel's path that reads the
residual instead of df).

    python bench/fingerprint.py            # run it before and after a refactor

A change that only moves code (the layer split, the .pxi split of the AFM kernels) must
print the same four hashes; within a run, the 1- and 2-thread hashes of a model match
(results do not depend on the thread count). A change of arithmetic changes them, and
then the kernel tests against the reference are the check.
"""
import hashlib

import afmfast
from afmfast.demo import make_demo_data


def fingerprints(backend="cython"):
    """{(model, threads): first 12 hex digits of the SHA-1 of its predictions}."""
    data = make_demo_data()
    out = {}
    for name, cls, kw in (("FM", afmfast.FM, dict(n_factors=16)),
                          ("FM plain", afmfast.FM,
                           dict(n_factors=16, keep=1.0, batch_norm=False)),
                          ("AFM", afmfast.AFM, dict(n_factors=16, attention_size=16))):
        for threads in (1, 2):
            model = cls(n_epochs=3, n_threads=threads, random_state=0, verbose=0,
                        backend=backend, **kw).fit(data.train, validation=data.valid)
            digest = hashlib.sha1(model.predict(data.valid).tobytes()).hexdigest()[:12]
            out[(name, threads)] = digest
    return out


if __name__ == "__main__":
    print(f"afmfast {afmfast.__version__} from {afmfast.__file__}, kernel ISA "
          f"{afmfast.build_info()['kernel_isa']}")
    for (name, threads), digest in fingerprints().items():
        print(f"{name:8s} {threads} thread(s): {digest}")
