"""Deconvolution: time to a Tikhonov solution, plain CG against tikhonov's choice.

The problems are the asv sizes of sparse_tconv.tools.solve_bench (128x128
blurs at damp 1e-2, one per padding mode, a 4 -> 4 channel layer, and the
anti-diagonal motion with reflect padding at damp 5e-3).
"""

try:
    from sparse_tconv.solvers import preconditioner, tikhonov
    from sparse_tconv.tools.solve_bench import ASV_PROBLEMS, RTOL, plain_cg
except ImportError:  # a commit before the solvers: its benchmarks are skipped
    ASV_PROBLEMS = {}

PROBLEMS = list(ASV_PROBLEMS) or ["gaussian-zeros"]


class Solvers:
    params = [PROBLEMS]
    param_names = ["problem"]
    timeout = 300

    def setup(self, problem):
        if not ASV_PROBLEMS:
            raise NotImplementedError("this commit has no sparse_tconv.solvers")
        self.problem = ASV_PROBLEMS[problem]
        self.op = self.problem.operator()
        self.y = self.problem.data(self.op)
        self.op.rmatvec(self.y)  # the transposed product form, built outside the timings

    def time_plain_cg(self, problem):
        plain_cg(self.op, self.y, self.problem.damp)

    def time_tikhonov(self, problem):
        # set-up of the preconditioner (or the FFT blocks) included
        tikhonov(self.op, self.y, self.problem.damp, rtol=RTOL)

    def time_preconditioner(self, problem):
        preconditioner(self.op, self.problem.damp)

    def track_plain_iterations(self, problem):
        return plain_cg(self.op, self.y, self.problem.damp)[1]

    track_plain_iterations.unit = "iterations"

    def track_tikhonov_iterations(self, problem):
        return tikhonov(self.op, self.y, self.problem.damp, rtol=RTOL)[1].iterations

    track_tikhonov_iterations.unit = "iterations"

    def peakmem_tikhonov(self, problem):
        tikhonov(self.op, self.y, self.problem.damp, rtol=RTOL)
