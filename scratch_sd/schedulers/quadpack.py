"""QUADPACK's QAGS (adaptive Gauss-Kronrod 21 with epsilon extrapolation), ported line by line.

Piessens, de Doncker-Kapenga, Ueberhuber, Kahaner, "QUADPACK: A Subroutine Package for Automatic
Integration" (Springer, 1983); routines dqagse, dqk21, dqpsrt, dqelg.

Why it is here: diffusers' LMSDiscreteScheduler computes its linear-multistep coefficients with
`scipy.integrate.quad(f, a, b, epsrel=1e-4)`, which is QAGS. The integrand is a Lagrange basis
polynomial evaluated in float32, so its float32 rounding noise sometimes makes QAGS subdivide and
extrapolate. Porting the same routine (same nodes, same order of floating-point operations, same
decisions) gives bit-identical coefficients instead of "close" ones. Arrays are 1-based as in the
Fortran so that each line can be checked against the original.
"""
from __future__ import annotations

import sys
from typing import Callable

EPMACH = sys.float_info.epsilon  # d1mach(4)
UFLOW = sys.float_info.min  # d1mach(1)
OFLOW = sys.float_info.max  # d1mach(2)

# Kronrod nodes xgk(1..11) (xgk(2), xgk(4), ... are the 10-point Gauss nodes), Kronrod weights wgk(1..11),
# Gauss weights wg(1..5); index 0 is unused padding so that indices match the Fortran.
XGK = (None, 0.995657163025808080735527280689003, 0.973906528517171720077964012084452,
       0.930157491355708226001207180059508, 0.865063366688984510732096688423493,
       0.780817726586416897063717578345042, 0.679409568299024406234327365114874,
       0.562757134668604683339000099272694, 0.433395394129247190799265943165784,
       0.294392862701460198131126603103866, 0.148874338981631210884826001129720, 0.0)
WGK = (None, 0.011694638867371874278064396062192, 0.032558162307964727478818972459390,
       0.054755896574351996031381300244580, 0.075039674810919952767043140916190,
       0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
       0.123491976262065851077958109831074, 0.134709217311473325928054001771707,
       0.142775938577060080797094273138717, 0.147739104901338491374841515972068,
       0.149445554002916905664936468389821)
WG = (None, 0.066671344308688137593568809893332, 0.149451349150580593145776339657697,
      0.219086362515982043995534934228163, 0.269266719309996355091226921569469,
      0.295524224714752870173892994651338)


def qk21(f: Callable[[float], float], a: float, b: float) -> tuple[float, float, float, float]:
    """21-point Gauss-Kronrod rule on [a, b]: (result, abserr, resabs, resasc) as dqk21."""
    centr = 0.5 * (a + b)
    hlgth = 0.5 * (b - a)
    dhlgth = abs(hlgth)
    fv1 = [0.0] * 11
    fv2 = [0.0] * 11
    resg = 0.0
    fc = f(centr)
    resk = WGK[11] * fc
    resabs = abs(resk)
    for j in range(1, 6):  # Gauss nodes
        jtw = 2 * j
        absc = hlgth * XGK[jtw]
        fval1 = f(centr - absc)
        fval2 = f(centr + absc)
        fv1[jtw] = fval1
        fv2[jtw] = fval2
        fsum = fval1 + fval2
        resg = resg + WG[j] * fsum
        resk = resk + WGK[jtw] * fsum
        resabs = resabs + WGK[jtw] * (abs(fval1) + abs(fval2))
    for j in range(1, 6):  # Kronrod-only nodes
        jtwm1 = 2 * j - 1
        absc = hlgth * XGK[jtwm1]
        fval1 = f(centr - absc)
        fval2 = f(centr + absc)
        fv1[jtwm1] = fval1
        fv2[jtwm1] = fval2
        fsum = fval1 + fval2
        resk = resk + WGK[jtwm1] * fsum
        resabs = resabs + WGK[jtwm1] * (abs(fval1) + abs(fval2))
    reskh = resk * 0.5
    resasc = WGK[11] * abs(fc - reskh)
    for j in range(1, 11):
        resasc = resasc + WGK[j] * (abs(fv1[j] - reskh) + abs(fv2[j] - reskh))
    result = resk * hlgth
    resabs = resabs * dhlgth
    resasc = resasc * dhlgth
    abserr = abs((resk - resg) * hlgth)
    if resasc != 0.0 and abserr != 0.0:
        abserr = resasc * min(1.0, (200.0 * abserr / resasc) ** 1.5)
    if resabs > UFLOW / (50.0 * EPMACH):
        abserr = max((EPMACH * 50.0) * resabs, abserr)
    return result, abserr, resabs, resasc


def _qpsrt(limit: int, last: int, maxerr: int, elist: list, iord: list, nrmax: int) -> tuple[int, float, int]:
    """dqpsrt: keep iord pointing at error estimates in decreasing order; returns (maxerr, ermax, nrmax)."""
    if last <= 2:
        iord[1] = 1
        iord[2] = 2
    else:
        errmax = elist[maxerr]
        if nrmax != 1:
            for _ in range(1, nrmax):
                isucc = iord[nrmax - 1]
                if errmax <= elist[isucc]:
                    break
                iord[nrmax] = isucc
                nrmax -= 1
        jupbn = last
        if last > (limit // 2 + 2):
            jupbn = limit + 3 - last
        errmin = elist[last]
        jbnd = jupbn - 1
        ibeg = nrmax + 1
        inserted = False
        i = ibeg
        for i in range(ibeg, jbnd + 1):
            isucc = iord[i]
            if errmax >= elist[isucc]:
                inserted = True
                break
            iord[i - 1] = isucc
        if not inserted:  # label 50
            iord[jbnd] = maxerr
            iord[jupbn] = last
        else:  # label 60
            iord[i - 1] = maxerr
            k = jbnd
            placed = False
            for _ in range(i, jbnd + 1):
                isucc = iord[k]
                if errmin < elist[isucc]:
                    iord[k + 1] = last  # label 80
                    placed = True
                    break
                iord[k + 1] = isucc
                k -= 1
            if not placed:
                iord[i] = last
    maxerr = iord[nrmax]
    return maxerr, elist[maxerr], nrmax


def _qelg(n: int, epstab: list, res3la: list, nres: int) -> tuple[int, float, float, int]:
    """dqelg: Wynn's epsilon algorithm on epstab(1..n); returns (n, result, abserr, nres)."""
    nres += 1
    abserr = OFLOW
    result = epstab[n]
    if n < 3:
        return n, result, max(abserr, 5.0 * EPMACH * abs(result)), nres
    limexp = 50
    epstab[n + 2] = epstab[n]
    newelm = (n - 1) // 2
    epstab[n] = OFLOW
    num = n
    k1 = n
    converged = False
    for i in range(1, newelm + 1):
        k2 = k1 - 1
        k3 = k1 - 2
        res = epstab[k1 + 2]
        e0 = epstab[k3]
        e1 = epstab[k2]
        e2 = res
        e1abs = abs(e1)
        delta2 = e2 - e1
        err2 = abs(delta2)
        tol2 = max(abs(e2), e1abs) * EPMACH
        delta3 = e1 - e0
        err3 = abs(delta3)
        tol3 = max(e1abs, abs(e0)) * EPMACH
        if not (err2 > tol2 or err3 > tol3):
            result = res  # e0, e1, e2 equal to machine accuracy: converged
            abserr = err2 + err3
            converged = True
            break
        e3 = epstab[k1]
        epstab[k1] = e1
        delta1 = e1 - e3
        err1 = abs(delta1)
        tol1 = max(e1abs, abs(e3)) * EPMACH
        if err1 <= tol1 or err2 <= tol2 or err3 <= tol3:
            n = i + i - 1  # label 20
            break
        ss = 1.0 / delta1 + 1.0 / delta2 - 1.0 / delta3
        epsinf = abs(ss * e1)
        if not epsinf > 1.0e-4:
            n = i + i - 1  # label 20
            break
        res = e1 + 1.0 / ss  # label 30
        epstab[k1] = res
        k1 = k1 - 2
        error = err2 + abs(res - e2) + err3
        if error > abserr:
            continue
        abserr = error
        result = res
    if not converged:
        if n == limexp:  # label 50: shift the table
            n = 2 * (limexp // 2) - 1
        ib = 2 if (num // 2) * 2 == num else 1
        ie = newelm + 1
        for _ in range(1, ie + 1):
            ib2 = ib + 2
            epstab[ib] = epstab[ib2]
            ib = ib2
        if num != n:
            indx = num - n + 1
            for i in range(1, n + 1):
                epstab[i] = epstab[indx]
                indx += 1
        if nres < 4:  # label 80
            res3la[nres] = result
            abserr = OFLOW
        else:  # label 90
            abserr = abs(result - res3la[3]) + abs(result - res3la[2]) + abs(result - res3la[1])
            res3la[1] = res3la[2]
            res3la[2] = res3la[3]
            res3la[3] = result
    abserr = max(abserr, 5.0 * EPMACH * abs(result))  # label 100
    return n, result, abserr, nres


def qags(f: Callable[[float], float], a: float, b: float, epsabs: float = 1.49e-8, epsrel: float = 1.49e-8,
         limit: int = 50) -> tuple[float, float]:
    """dqagse with scipy.integrate.quad's defaults (epsabs 1.49e-8, limit 50): returns (result, abserr)."""
    alist = [0.0] * (limit + 1)
    blist = [0.0] * (limit + 1)
    rlist = [0.0] * (limit + 1)
    elist = [0.0] * (limit + 1)
    iord = [0] * (limit + 1)
    rlist2 = [0.0] * 53
    res3la = [0.0] * 4
    ier = 0
    alist[1], blist[1] = a, b
    if epsabs <= 0.0 and epsrel < max(50.0 * EPMACH, 0.5e-28):
        raise ValueError("qags: invalid tolerances")
    ierro = 0
    result, abserr, defabs, resabs = qk21(f, a, b)
    # 1. first approximation; accept it when the error estimate is already good enough
    dres = abs(result)
    errbnd = max(epsabs, epsrel * dres)
    last = 1
    rlist[1] = result
    elist[1] = abserr
    iord[1] = 1
    if abserr <= 100.0 * EPMACH * defabs and abserr > errbnd:
        ier = 2
    if limit == 1:
        ier = 1
    if ier != 0 or (abserr <= errbnd and abserr != resabs) or abserr == 0.0:
        return result, abserr
    # 2. initialisation of the adaptive loop
    rlist2[1] = result
    errmax = abserr
    maxerr = 1
    area = result
    errsum = abserr
    abserr = OFLOW
    nrmax = 1
    nres = 0
    numrl2 = 2
    ktmin = 0
    extrap = False
    noext = False
    iroff1 = iroff2 = iroff3 = 0
    small = erlarg = ertest = correc = 0.0
    goto = None  # where the loop is left: "100" or "115"
    # 3. bisect the interval with the largest error until the sum of errors is small enough
    for last in range(2, limit + 1):
        a1 = alist[maxerr]
        b1 = 0.5 * (alist[maxerr] + blist[maxerr])
        a2 = b1
        b2 = blist[maxerr]
        erlast = errmax
        area1, error1, _, defab1 = qk21(f, a1, b1)
        area2, error2, _, defab2 = qk21(f, a2, b2)
        area12 = area1 + area2
        erro12 = error1 + error2
        errsum = errsum + erro12 - errmax
        area = area + area12 - rlist[maxerr]
        if not (defab1 == error1 or defab2 == error2):
            if not (abs(rlist[maxerr] - area12) > 1.0e-5 * abs(area12) or erro12 < 0.99 * errmax):
                if extrap:
                    iroff2 += 1
                else:
                    iroff1 += 1
            if last > 10 and erro12 > errmax:
                iroff3 += 1
        rlist[maxerr] = area1
        rlist[last] = area2
        errbnd = max(epsabs, epsrel * abs(area))
        if iroff1 + iroff2 >= 10 or iroff3 >= 20:
            ier = 2
        if iroff2 >= 5:
            ierro = 3
        if last == limit:
            ier = 1
        if max(abs(a1), abs(b2)) <= (1.0 + 100.0 * EPMACH) * (abs(a2) + 1000.0 * UFLOW):
            ier = 4
        if not error2 > error1:
            alist[last] = a2
            blist[maxerr] = b1
            blist[last] = b2
            elist[maxerr] = error1
            elist[last] = error2
        else:
            alist[maxerr] = a2
            alist[last] = a1
            blist[last] = b1
            rlist[maxerr] = area2
            rlist[last] = area1
            elist[maxerr] = error2
            elist[last] = error1
        maxerr, errmax, nrmax = _qpsrt(limit, last, maxerr, elist, iord, nrmax)
        if errsum <= errbnd:
            goto = "115"
            break
        if ier != 0:
            goto = "100"
            break
        if last == 2:  # label 80
            small = abs(b - a) * 0.375
            erlarg = errsum
            ertest = errbnd
            rlist2[2] = area
            continue
        if noext:
            continue
        erlarg = erlarg - erlast
        if abs(b1 - a1) > small:
            erlarg = erlarg + erro12
        if not extrap:
            if abs(blist[maxerr] - alist[maxerr]) > small:
                continue
            extrap = True
            nrmax = 2
        # label 40
        if not (ierro == 3 or erlarg <= ertest):
            jupbnd = last
            if last > (2 + limit // 2):
                jupbnd = limit + 3 - last
            left_to_90 = False
            for _ in range(nrmax, jupbnd + 1):
                maxerr = iord[nrmax]
                errmax = elist[maxerr]
                if abs(blist[maxerr] - alist[maxerr]) > small:
                    left_to_90 = True
                    break
                nrmax += 1
            if left_to_90:
                continue
        # label 60: extrapolate
        numrl2 += 1
        rlist2[numrl2] = area
        numrl2, reseps, abseps, nres = _qelg(numrl2, rlist2, res3la, nres)
        ktmin += 1
        if ktmin > 5 and abserr < 1.0e-3 * errsum:
            ier = 5
        if abseps < abserr:
            ktmin = 0
            abserr = abseps
            result = reseps
            correc = erlarg
            ertest = max(epsabs, epsrel * abs(reseps))
            if abserr <= ertest:
                goto = "100"
                break
        # label 70
        if numrl2 == 1:
            noext = True
        if ier == 5:
            goto = "100"
            break
        maxerr = iord[1]
        errmax = elist[maxerr]
        nrmax = 1
        extrap = False
        small = small * 0.5
        erlarg = errsum
    # 4. final result: the extrapolated value or the plain sum over the subintervals
    if goto == "100":
        if abserr == OFLOW:
            goto = "115"
        elif ier + ierro != 0:
            if ierro == 3:
                abserr = abserr + correc
            if ier == 0:
                ier = 3
            if result != 0.0 and area != 0.0:
                if abserr / abs(result) > errsum / abs(area):
                    goto = "115"
            elif abserr > errsum:
                goto = "115"
            elif area == 0.0:
                return result, abserr
    # (QUADPACK's divergence test, label 110, only sets ier = 6; it never changes the result, so it is omitted.)
    if goto == "115":
        result = 0.0
        for k in range(1, last + 1):
            result = result + rlist[k]
        abserr = errsum
    return result, abserr
