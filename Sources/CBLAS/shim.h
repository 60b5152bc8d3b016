// The one place OpenBLAS enters Continuum: only the Tensor module imports CBLAS.
#include <cblas.h>
